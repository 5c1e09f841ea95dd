"""The local anomaly model: a U-Net (model.py) that learns, from the user's normal images
alone, to segment synthetic anomalies made from them (anomalies.py, fit.py)."""

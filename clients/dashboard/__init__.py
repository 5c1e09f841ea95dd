"""`cmg stream --dashboard`: the live line page (Starlette app, per-camera state, assets)."""

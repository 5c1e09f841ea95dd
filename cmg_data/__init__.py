"""The data layer: the synthetic factory scene renderer (`cmg data synth`). Imports no torch."""

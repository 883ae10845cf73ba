"""The model: noise schedules, the noise-prediction network and the VDM with its bound."""

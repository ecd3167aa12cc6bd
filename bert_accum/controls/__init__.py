"""The drift controls: each cause of (B, N) drift as a switch (dropout masks, padding, loss normalisation,
and the known loop bugs reproduced on purpose)."""

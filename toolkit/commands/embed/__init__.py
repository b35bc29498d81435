"""`dcnc embed` and the corpus pass of `dcnc verify --corpus`: items read from Parquet or .npz, run through a tower
locally (command, local) or on Ray Data (on_ray), written keyed and whole (output)."""

"""`raee-admin`."""

"""d-utils: Docker/OCI images as plain folders, run unprivileged with bubblewrap."""

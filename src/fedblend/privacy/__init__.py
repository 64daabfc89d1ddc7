"""Client-level differential privacy (clip on the client, Gaussian noise on the server)."""

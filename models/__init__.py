"""Models: architectures, the red-team attack zoo and the stored model zoo."""

"""The kgpu cloud controller (see issue 3 onwards)."""

"""Engine implementations. ``standalone`` needs diffusers + transformers; import it lazily."""

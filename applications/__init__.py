"""Applications built on the binopt library."""

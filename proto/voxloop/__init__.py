"""voxloop: streaming speech recognition that learns from its users."""

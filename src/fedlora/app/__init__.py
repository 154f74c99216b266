"""What a run needs around the loop: its folder, checkpoints, comparisons, progress."""

"""The llama-server children: checked before launch, started so they cannot outlive the
daemon, their output kept, restarted within a budget, placed on the GPU they were given."""

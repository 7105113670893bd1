"""What a binary model costs: its bits and sizes per layer (`accounting`) and its speed and memory measured on this
machine against its float32 twin (`deployment`)."""

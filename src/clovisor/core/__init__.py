"""The sans-I/O core: segments in, sessions out. No sockets, clocks or threads."""

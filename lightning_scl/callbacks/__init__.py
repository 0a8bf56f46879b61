"""Lightning callbacks: thin adapters from Lightning hooks to the pure-torch pieces."""

"""Gatehouse's training module: pure PyTorch, never imports Django (arrives with its own issue)."""

"""Launchers: one Python function per op, dispatching to the triton / cuda / torch backends."""

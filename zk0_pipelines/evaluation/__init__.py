"""Closed-loop evaluation of policies in the SO-101 simulator."""

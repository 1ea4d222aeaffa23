"""Data contracts between danqing stages: drop-reason names and pandera models."""

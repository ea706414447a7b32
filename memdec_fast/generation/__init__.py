"""Helpers of :class:`memdec_fast.JointGenerator`: requests, text, and compatibility checks."""

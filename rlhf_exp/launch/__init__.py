"""Launching: distributed environment checks and the mapping of our config onto TRL/accelerate arguments."""

"""
ctrlgw: a controller gateway for fleets of devices on long-lived TCP connections.
"""

__version__ = "0.1.0"

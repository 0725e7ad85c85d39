"""
Declares C{twistd ctrlgw}; everything is imported lazily, when the command runs.
"""

from twisted.application.service import ServiceMaker

ctrlgw = ServiceMaker(
    "ctrlgw",
    "ctrlgw.tap",
    "A controller gateway: long-lived device connections, cluster-wide ownership, "
    "PostgreSQL-backed inbox and command outbox.",
    "ctrlgw",
)

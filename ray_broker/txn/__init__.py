"""Pure transaction coordinator (transactions v2, KIP-890). No Ray, no I/O: see `coordinator`."""
from .coordinator import (CoordinatorResult, EndTxnResponse, InitProducerIdResponse, MarkerPlan,
                          TxnCoordinatorShard, TxnDescription)
from .metadata import TxnMetadata, TxnTransition
from .state import ALLOWED_PREVIOUS, IllegalStateTransition, TxnState, check_transition

__all__ = ["ALLOWED_PREVIOUS", "CoordinatorResult", "EndTxnResponse", "IllegalStateTransition",
           "InitProducerIdResponse", "MarkerPlan", "TxnCoordinatorShard", "TxnDescription", "TxnMetadata",
           "TxnState", "TxnTransition", "check_transition"]

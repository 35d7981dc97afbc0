"""Pure group coordinator: consumer-group membership and rebalances, committed and transactional
offsets, and the ``__consumer_offsets`` records that make them durable. No Ray, no I/O, no clock:
time arrives as ``now_ms``; an actor wraps `GroupCoordinatorShard`."""
from .assignors import (ASSIGNORS, CooperativeStickyAssignor, RangeAssignor, RoundRobinAssignor, Subscription,
                        assignor_for)
from .coordinator import CoordinatorResult, GroupCoordinatorShard, GroupDescription, GroupListing, MemberDescription
from .group import ConsumerGroup, GroupMember, JoinResult, SyncResult
from .offsets import OffsetAndMetadata, OffsetStore
from .state import ALLOWED_PREVIOUS, GroupState, IllegalGroupStateTransition, check_transition

__all__ = [
    "ASSIGNORS", "CooperativeStickyAssignor", "RangeAssignor", "RoundRobinAssignor", "Subscription", "assignor_for",
    "CoordinatorResult", "GroupCoordinatorShard", "GroupDescription", "GroupListing", "MemberDescription",
    "ConsumerGroup", "GroupMember", "JoinResult", "SyncResult", "OffsetAndMetadata", "OffsetStore",
    "ALLOWED_PREVIOUS", "GroupState", "IllegalGroupStateTransition", "check_transition",
]

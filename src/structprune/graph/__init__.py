from .dependency import DependencyGraph, is_in_channel_pruning_fn, is_out_channel_pruning_fn
from .group import Dependency, Group, GroupItem, Node
from .refusal import Blocked, Refusal, RefusalKind
from .side import Side

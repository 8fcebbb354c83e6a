"""Starting work on Ray: the Train driver behind `mmbalance train --workers` (and Tune trials)
and its failure policy, connecting to and sizing a Ray cluster, and `mmbalance submit` (Ray Jobs)."""

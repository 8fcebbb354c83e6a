"""Ray drivers: the Train driver used by `mmbalance train --workers` (and Tune trials), and
connecting to / sizing a Ray cluster."""

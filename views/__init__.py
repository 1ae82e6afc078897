"""What a run discovered, for people to look at: the cluster gallery and confusion matrices."""

"""Running the training stages on a cluster: launch by topology, memory preflight."""

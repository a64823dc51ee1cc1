"""Scale-out over Redis: API replicas put jobs on Redis Streams, workers run them."""

"""Example handlers for lrq queues."""

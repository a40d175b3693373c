"""citygate agent: the daemon and its command line."""

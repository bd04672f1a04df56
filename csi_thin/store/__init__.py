"""Node-local metadata stores: the LMDB store of device records, id allocation and the journal."""

"""Loading models, knowing their anatomy, and cutting layers out of them."""

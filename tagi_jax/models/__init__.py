"""The model side: T5 layers and network, the adapters contract, the hypernetwork, teachers and TAGI."""

"""The 2PC runtime: ring arithmetic, the dealer, transports, and SecFormer's protocols."""

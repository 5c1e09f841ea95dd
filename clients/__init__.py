"""`cmg_clients`: gRPC/HTTP clients and the factory-stream client. Imports no torch."""

"""The candidates service: candidate sources behind gRPC `Generate`."""

"""The job library the API and the workers share: the contract, the Redis event log and its
feed, leases and worker liveness. Imports no torch."""

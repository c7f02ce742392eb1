"""Wire protocols of icp-bridge: ICP (pbRPC over a UNIX socket) and the
framed Thrift server. Nothing here knows about sessions; handlers are
injected. This package must never import ``bridge``."""

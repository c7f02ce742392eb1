"""The icp-bridge application: sessions, auth, tokens, permissions, the OTS
API and ICP handlers, configuration and the service tree."""

"""HTTP routes: thin — parse, call a service, shape the response."""

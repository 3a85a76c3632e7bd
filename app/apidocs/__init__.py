"""The API documentation: the WebSocket protocol (AsyncAPI, a readable page), the REST OpenAPI
document's provider, and the offline REST documentation UIs."""

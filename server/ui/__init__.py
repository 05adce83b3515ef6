"""The web console's static assets (index.html, app.js, app.css), served by server.api.ui."""

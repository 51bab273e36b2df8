"""HTTP plumbing shared by our servers and clients, so none of them borrows it from another: listening sockets
(``listener``), the 4xx error shape of refused requests (``http_errors``) and the transport errors of aiohttp
clients (``transport``)."""

from twisted.application.service import ServiceMaker

relay = ServiceMaker("relay", "relay.app.twistd", "A durable SMTP mail relay", "relay")

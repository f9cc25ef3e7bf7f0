from twisted.application.service import ServiceMaker

relay = ServiceMaker("relay", "relay.tap", "A durable SMTP mail relay", "relay")

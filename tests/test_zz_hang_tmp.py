import time
def test_hang(etcd, dockerd, moto, prometheus_server, busybox_images):
    prometheus_server(["127.0.0.1:1"])
    dockerd.client().containers.run(busybox_images["v1"], ["sleep", "1000"], network_mode="none", detach=True)
    dockerd.client().containers.run(busybox_images["v1"], ["httpd", "-f", "-p", "18111", "-h", "/www"], network_mode="host", detach=True)
    print("READY", flush=True)
    time.sleep(60)

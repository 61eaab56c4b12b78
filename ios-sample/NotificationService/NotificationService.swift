import Herald
import UserNotifications

/// Runs for alert pushes that carry `mutable-content: 1`, in its own process: turns the
/// push into the message with `handlePush` (fetching the body of a sync hint, with the
/// sign-in and SDK data directory the app shares through the App Group) and shows the
/// message's own title and body. The SDK records the message as handled, so the app
/// does not list it as new again when it connects.
final class NotificationService: UNNotificationServiceExtension {
    private let lock = NSLock()
    private var contentHandler: ((UNNotificationContent) -> Void)?
    private var bestAttempt: UNMutableNotificationContent?

    override func didReceive(
        _ request: UNNotificationRequest,
        withContentHandler contentHandler: @escaping (UNNotificationContent) -> Void
    ) {
        let content = (request.content.mutableCopy() as? UNMutableNotificationContent) ?? UNMutableNotificationContent()
        lock.lock()
        self.contentHandler = contentHandler
        bestAttempt = content
        lock.unlock()

        guard let signIn = SampleSettings.signIn,
              let json = pushPayloadJson(request.content.userInfo),
              isHeraldPush(payloadJson: json)
        else {
            deliver()
            return
        }
        // handlePush blocks on HTTP: keep it off the thread that called us.
        DispatchQueue.global(qos: .userInitiated).async {
            self.fill(content, from: json, signIn: signIn)
            self.deliver()
        }
    }

    override func serviceExtensionTimeWillExpire() {
        deliver()
    }

    private func fill(_ content: UNMutableNotificationContent, from json: String, signIn: SignIn) {
        let config = ClientConfig(
            baseUrl: signIn.gatewayUrl,
            deviceId: SampleSettings.deviceId,
            dataDir: SampleSettings.dataDir,
            requestTimeoutMs: 8000
        )
        do {
            let client = try HeraldClient(
                config: config,
                listener: SilentListener(),
                tokenProvider: SampleBackendTokenProvider(backendUrl: signIn.backendUrl, user: signIn.user)
            )
            // handlePush has recorded and acked by the time it returns (or given up
            // within its deadline, well inside the extension's ~30 s): shutting down
            // right after loses nothing.
            defer { client.shutdown() }
            let fresh = try client.handlePush(payloadJson: json).messages
            guard let last = fresh.last else {
                return
            }
            let shown = ReceivedMessage(last, viaPush: true)
            content.title = shown.title
            content.body = shown.body
            if fresh.count > 1 {
                content.subtitle = "+\(fresh.count - 1) more"
            }
        } catch {
            // Show the push as it came; the app catches up when it connects.
        }
    }

    /// Hands the content to the system exactly once.
    private func deliver() {
        lock.lock()
        let handler = contentHandler
        let content = bestAttempt
        contentHandler = nil
        lock.unlock()
        if let handler = handler, let content = content {
            handler(content)
        }
    }
}

/// The extension never connects, so no callback is expected.
private final class SilentListener: HeraldListener {
    func onStateChanged(state: ConnectionState) {}
    func onMessage(message: HeraldMessage) {}
    func onError(event: ErrorEvent) {}
    func onSubscriptionChanged(topic: String, subscribed: Bool) {}
    func onSubscriptionFailed(topic: String, subscribe: Bool, code: String, message detail: String) {}
}

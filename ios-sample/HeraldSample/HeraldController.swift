import Foundation
import Herald
import Network

/// The connection badge.
struct Badge: Equatable {
    enum Tone { case good, busy, idle, bad }

    let label: String
    let tone: Tone
}

extension Badge {
    init(_ state: ConnectionState) {
        switch state {
        case .connected:
            self.init(label: "Connected", tone: .good)
        case .connecting:
            self.init(label: "Connecting…", tone: .busy)
        case let .waitingToReconnect(delayMs):
            self.init(label: "Retrying in \((delayMs + 999) / 1000) s", tone: .busy)
        case .suspended:
            self.init(label: "Suspended", tone: .idle)
        case .disconnected:
            self.init(label: "Disconnected", tone: .idle)
        case .closed:
            self.init(label: "Closed", tone: .bad)
        }
    }
}

/// What a push turned out to be.
enum PushOutcome {
    /// A Herald push; this many of its messages were new (0: already seen live).
    case herald(newMessages: Int)
    /// Not Herald's (another SDK's push).
    case foreign
    /// Herald's, but it could not be handled (gateway unreachable and no content).
    case failed
}

/// Owns the HeraldClient and turns its callbacks, pushes and the app's lifecycle and
/// network events into published state for SwiftUI. Used from the main thread; the
/// blocking SDK calls (registerPushToken, handlePush) run on `blocking`.
final class HeraldController: ObservableObject {
    @Published private(set) var user: String?
    @Published private(set) var badge = Badge(ConnectionState.disconnected)
    @Published private(set) var messages: [ReceivedMessage] = []
    @Published private(set) var lastError: String?
    @Published private(set) var pushStatus: String?

    private var heraldClient: HeraldClient?
    private var seenIds = Set<String>()
    private var apnsToken: String?
    private let blocking = DispatchQueue(label: "dev.herald.sample.blocking")
    private let pathMonitor = NWPathMonitor()

    init() {
        // NWPathMonitor → networkChanged: the SDK suspends while offline and reconnects
        // at once when a path is back, instead of waiting out its backoff.
        pathMonitor.pathUpdateHandler = { [weak self] path in
            let available = path.status == .satisfied
            DispatchQueue.main.async {
                self?.heraldClient?.networkChanged(available: available)
            }
        }
        pathMonitor.start(queue: DispatchQueue(label: "dev.herald.sample.path"))
        if let saved = SampleSettings.signIn {
            signIn(saved)
        }
    }

    /// Stub sign-in: remember who and where, create the client, connect.
    func signIn(_ signIn: SignIn) {
        heraldClient?.shutdown()
        SampleSettings.signIn = signIn
        let config = ClientConfig(
            baseUrl: signIn.gatewayUrl,
            deviceId: SampleSettings.deviceId,
            dataDir: SampleSettings.dataDir
        )
        do {
            let created = try HeraldClient(
                config: config,
                listener: ListenerBridge(self),
                tokenProvider: SampleBackendTokenProvider(backendUrl: signIn.backendUrl, user: signIn.user)
            )
            heraldClient = created
            user = signIn.user
            lastError = nil
            created.connect()
            if let token = apnsToken {
                register(apnsToken: token)
            }
        } catch {
            lastError = "could not start the SDK: \(error)"
        }
    }

    /// Logout: the gateway forgets this installation's push token (no more pushes for
    /// the old user) and the SDK its local state, off the main thread; then the client
    /// is shut down.
    func signOut() {
        if let client = heraldClient {
            blocking.async {
                try? client.unregister()
                try? client.reset()
                client.shutdown()
            }
        }
        heraldClient = nil
        SampleSettings.signIn = nil
        user = nil
        messages = []
        seenIds = []
        badge = Badge(ConnectionState.disconnected)
    }

    /// scenePhase `.active`.
    func foreground() {
        heraldClient?.appForeground()
    }

    /// scenePhase `.background`: the SDK closes the socket (APNs takes over).
    func background() {
        heraldClient?.appBackground()
    }

    /// Pull to refresh: pending messages over HTTP, delivered through the listener.
    func refresh() {
        heraldClient?.syncNow()
    }

    /// `didRegisterForRemoteNotificationsWithDeviceToken`: hex-encode and register.
    func apnsTokenReceived(_ deviceToken: Data) {
        let hex = deviceToken.map { String(format: "%02x", $0) }.joined()
        apnsToken = hex
        register(apnsToken: hex)
    }

    func apnsRegistrationFailed(_ error: Error) {
        pushStatus = "APNs registration failed: \(error.localizedDescription)"
    }

    /// A remote notification's userInfo (background push, or an alert while in the
    /// foreground). `done` is called on the main thread.
    func handlePush(_ userInfo: [AnyHashable: Any], done: @escaping (PushOutcome) -> Void) {
        guard let client = heraldClient, let json = pushPayloadJson(userInfo) else {
            done(.foreign)
            return
        }
        blocking.async {
            let outcome: PushOutcome
            var fresh: [HeraldMessage] = []
            do {
                fresh = try client.handlePush(payloadJson: json).messages
                outcome = .herald(newMessages: fresh.count)
            } catch HeraldError.NotHeraldPush {
                outcome = .foreign
            } catch {
                outcome = .failed
            }
            DispatchQueue.main.async {
                self.add(fresh, viaPush: true)
                done(outcome)
            }
        }
    }

    private func register(apnsToken token: String) {
        guard let client = heraldClient else {
            return
        }
        #if DEBUG
        let environment = ApnsEnvironment.sandbox
        #else
        let environment = ApnsEnvironment.production
        #endif
        blocking.async {
            let status: String
            do {
                let registration = try client.registerPushToken(
                    provider: PushProvider.apns, token: token, environment: environment)
                status = "APNs token \(registration.pushTokenState)"
            } catch {
                status = "APNs token not registered: \(error)"
            }
            DispatchQueue.main.async {
                self.pushStatus = status
            }
        }
    }

    fileprivate func stateChanged(_ state: ConnectionState) {
        badge = Badge(state)
    }

    fileprivate func failed(_ event: ErrorEvent) {
        lastError = event.terminal ? "\(event.error) (stopped; sign in again)" : "\(event.error)"
    }

    fileprivate func topicRefused(_ topic: String, code: String) {
        lastError = "topic \(topic) refused: \(code)"
    }

    fileprivate func add(_ received: [HeraldMessage], viaPush: Bool) {
        // The SDK gives each message once, through the listener or handlePush; the id
        // check keeps the list right if the same message is also added another way.
        let fresh = received.filter { seenIds.insert($0.id).inserted }
        guard !fresh.isEmpty else {
            return
        }
        messages = (messages + fresh.map { ReceivedMessage($0, viaPush: viaPush) })
            .sorted { $0.seq > $1.seq }
    }
}

/// The SDK's listener. Called on one SDK thread, in order; hops to the main thread.
/// Holds the controller weakly (the client holds the listener). `@unchecked Sendable`
/// (HeraldListener is Sendable): the controller is only touched on the main thread.
private final class ListenerBridge: HeraldListener, @unchecked Sendable {
    private weak var controller: HeraldController?

    init(_ controller: HeraldController) {
        self.controller = controller
    }

    func onStateChanged(state: ConnectionState) {
        DispatchQueue.main.async { self.controller?.stateChanged(state) }
    }

    func onMessage(message: HeraldMessage) {
        // The SDK acks after this returns; hand the message off and return at once.
        DispatchQueue.main.async { self.controller?.add([message], viaPush: false) }
    }

    func onError(event: ErrorEvent) {
        DispatchQueue.main.async { self.controller?.failed(event) }
    }

    func onSubscriptionChanged(topic: String, subscribed: Bool) {}

    func onSubscriptionFailed(topic: String, subscribe: Bool, code: String, message detail: String) {
        DispatchQueue.main.async { self.controller?.topicRefused(topic, code: code) }
    }
}

import Foundation

/// What the stub sign-in asks for. A real app signs the user in to its own backend.
struct SignIn: Equatable {
    var gatewayUrl: String
    var backendUrl: String
    var user: String
}

/// Settings shared by the app and its notification service extension through the App
/// Group (both processes must use the same device id and the same SDK data directory,
/// so a message handled by one is not shown again by the other).
enum SampleSettings {
    /// `HeraldAppGroup` of Info.plist, derived from `SAMPLE_BUNDLE_PREFIX` in project.yml
    /// like the App Group entitlement of both targets.
    static let appGroup = Bundle.main.object(forInfoDictionaryKey: "HeraldAppGroup") as? String
        ?? "group.dev.herald.sample"

    static var defaults: UserDefaults {
        UserDefaults(suiteName: appGroup) ?? .standard
    }

    /// One id per installation: a device id belongs to the first user that uses it.
    static var deviceId: String {
        if let id = defaults.string(forKey: "device_id") {
            return id
        }
        let id = "ios-" + UUID().uuidString.lowercased()
        defaults.set(id, forKey: "device_id")
        return id
    }

    /// The SDK's SQLite directory, in the App Group container when there is one.
    static var dataDir: String {
        let fm = FileManager.default
        let base = fm.containerURL(forSecurityApplicationGroupIdentifier: appGroup)
            ?? fm.urls(for: .applicationSupportDirectory, in: .userDomainMask)[0]
        let dir = base.appendingPathComponent("herald", isDirectory: true)
        try? fm.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir.path
    }

    static var signIn: SignIn? {
        get {
            guard let user = defaults.string(forKey: "user") else {
                return nil
            }
            return SignIn(
                gatewayUrl: defaults.string(forKey: "gateway_url") ?? "",
                backendUrl: defaults.string(forKey: "backend_url") ?? "",
                user: user
            )
        }
        set {
            if let value = newValue {
                defaults.set(value.gatewayUrl, forKey: "gateway_url")
                defaults.set(value.backendUrl, forKey: "backend_url")
                defaults.set(value.user, forKey: "user")
            } else {
                defaults.removeObject(forKey: "user")
            }
        }
    }
}
